"""safesteer_data: what calibration, tuning and evaluation all read (torch-free).

Prompt sets and their seeded splits (``prompt_sets``, ``contrast_prompts``, ``jailbreaks``), the keyword
refusal judge (``judges``), FigStep-style typographic renders (``typography``) and the probe's statistics
(``probe``). ``safesteer_export`` and ``safesteer_eval`` both import from here; neither imports the other.
"""

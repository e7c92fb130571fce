"""The package's exception hierarchy. Every message says what is wrong and what to do."""


class SafeSteerError(Exception):
    """Base class of every error this package raises on purpose."""


class ArtifactError(SafeSteerError):
    """An artifact directory is missing files, has corrupt files or an unsupported manifest."""


class InputError(SafeSteerError, ValueError):
    """A request cannot be served as given (prompt, image or knob)."""


class PromptTooLongError(InputError):
    """The prompt (with image tokens and max_new_tokens) does not fit the context window."""


class ImageError(InputError):
    """An image could not be read or decoded."""


class ConfigError(InputError):
    """A knob (sampling, safety, providers, export option) has an invalid value."""


class BusyError(SafeSteerError, RuntimeError):
    """A Generator was asked for a second request while one is still being served (another thread, or a stream
    that has not finished)."""


class UnsupportedArchitectureError(SafeSteerError):
    """The checkpoint's architecture has no registered model family."""


class ExportValidationError(SafeSteerError):
    """Exported graphs disagree with PyTorch; ``mismatches`` lists every one found."""

    def __init__(self, mismatches: list[str]):
        self.mismatches = list(mismatches)
        lines = "\n  - ".join(self.mismatches)
        super().__init__(
            f"{len(self.mismatches)} exported output(s) differ from PyTorch beyond tolerance:\n  - {lines}\n"
            "The artifact was not written as valid. Report this with the model's config.json."
        )

"""safesteer-eval: what SafeSteer buys and costs on one artifact (suites x modes x judges)."""

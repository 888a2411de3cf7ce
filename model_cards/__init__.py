"""Model card templates (``hfquant.md``), shipped inside the package as ``hfquant.model_cards``."""

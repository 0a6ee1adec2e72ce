"""Model loading with quantize-on-load, target selection and LoRA injection."""

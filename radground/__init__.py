"""radground: spatially grounded radiology VLM datasets and training, as an operated platform."""

__version__ = "0.1.0"

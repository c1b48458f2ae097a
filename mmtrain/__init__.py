"""mmtrain: sequence packing and balancing for data-imbalanced VLM training on megatron-core."""

__version__ = "0.1.0"

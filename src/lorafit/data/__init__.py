"""The data path: sources -> prompts -> tokenization -> examples -> packing -> batching, with
the prepared-data cache and the LightningDataModule that orchestrates them."""

"""FreiHAND v2 TFDS builder (`freihand_dataset_builder.Builder`) and fake data."""

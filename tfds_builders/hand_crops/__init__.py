"""In-the-wild hand crops for pre-training (`tfds new` layout)."""

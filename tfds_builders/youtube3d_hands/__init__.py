"""YouTube3DHands hand crops (`tfds new` layout)."""

"""Hand geometry: joint orders, crops, projection and 2.5D, the view augmentation."""

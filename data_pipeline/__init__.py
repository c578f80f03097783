"""Everything before the model sees a batch: dataset builders, preprocessing, grain loaders."""

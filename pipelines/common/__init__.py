"""What every stage shares: recipes, storage, tracking, Ray start-up, the manifest reader, the
feature cache, batch preparation, checkpoint transfer and the wire types."""

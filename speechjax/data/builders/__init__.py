"""TFDS dataset builders (array_record, numpy only: TensorFlow is not needed)."""

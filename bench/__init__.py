"""mmfuse's benchmark suite and its one table of real model shapes (installed as ``mmfuse.bench``)."""

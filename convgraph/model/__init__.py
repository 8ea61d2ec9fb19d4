"""The model: a ConvGraph view of an ONNX model with every tensor's shape (``loader``, ``graph``, ``shapes``,
``propagate``, ``probe``, ``expr``), its weights (``weights``) and the per-conv record (``record``, ``convops``,
``arithmetic``)."""

"""Running models with onnxruntime: sessions (``runtime``), inputs (``inputs``, ``synthetic``), timing
(``bench``) and comparing outputs (``metrics``). It knows ModelProtos and arrays, not the ConvGraph."""

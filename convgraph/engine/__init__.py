"""The rewrite engine: apply rules (``rewrite``), check the result (``rewrite_check``, ``regions``, ``verify``,
``localize``), report it (``rewrite_report``); ``calibrate`` gathers the statistics the fits read."""

"""Analysis: one record per conv (``analyze``, with ``patterns``, ``receptive``, ``roofline``), printed
(``report``) and measured per layer (``profile``)."""

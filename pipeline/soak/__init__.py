"""Soak testing: replay files (:mod:`.replay`), ``pipeline record`` (:mod:`.record`),
``pipeline soak`` (:mod:`.soak`) and its PNG chart (:mod:`.chart`)."""

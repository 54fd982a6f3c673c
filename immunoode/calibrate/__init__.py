"""Calibration: fit population and mechanistic parameters to clinical rates
(:mod:`.targets`, :mod:`.likelihood`, :mod:`.vpop`, :mod:`.fit`) and to
concentration/tumor-size time courses (:mod:`.timecourse`)."""

"""Empirical privacy auditing: the white-box gradient-canary audit (:mod:`~fxdp.auditing.canary`, exported as
``fxdp.audit``) and its statistics (:mod:`~fxdp.auditing.stats`: Clopper-Pearson and GDP estimates of ε)."""

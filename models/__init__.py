"""Model files shipped with immunoode (installed as the ``immunoode.models`` package data)."""

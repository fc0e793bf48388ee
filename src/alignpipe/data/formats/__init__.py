"""The accepted data formats, one module each; :mod:`alignpipe.data.convert` reads them.

trl, hh (:mod:`.trl`), sharegpt, llamafactory, oasst, ultrafeedback and helpsteer (:mod:`.rated`).
"""

"""Black-box conformance and fuzzing suite for cpn/1 gateways, written from protocol-spec/ alone.

It never imports ``cpnd``: it is a second implementation, so that the spec, not the
reference code, is what gets tested.
"""

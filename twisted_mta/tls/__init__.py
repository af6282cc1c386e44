"""
The outbound TLS engine: policies and the policy map (C{policy}), the
failure classes (C{failure}), the fallback deciders and hard rules
(C{fallback}), the handshake record and its judgement (C{handshake}), the
engine that ties them to the configuration and words the explanations
(C{engine}, C{entries}), the per-destination history (C{history}), the
shadow report (C{shadow}) and C{tls explain} (C{probe}).
"""

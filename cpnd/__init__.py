"""cpn: a computing power network for stateless compute services.

``cpnd`` gateways peer over an authenticated, encrypted session protocol, flood
service advertisements keyed by URL-PATH, and route every HTTP request to the best
instance with no central controller.
"""

__version__ = "0.1.0"

"""Envoy's xDS from the control plane: waypoints' configuration (waypoint.py) over ADS
(ads.py)."""

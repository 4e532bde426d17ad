"""`mathtune ui`: a local web page over the run folders (server.py; the security rules in security.py)."""

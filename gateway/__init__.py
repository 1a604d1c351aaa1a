"""The Flask gateway served by gunicorn: routing rules, proxy, status API."""

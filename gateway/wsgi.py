"""gunicorn entry point: `gunicorn gateway.wsgi:app` (configured by `autodeploy serve`)."""
from gateway.app import create_app

app = create_app()

"""gunicorn entry point of `autodeploy gateway-static`."""
from gateway.app import create_app
from gateway.static import StaticControlPlane

app = create_app(control=StaticControlPlane.from_env())

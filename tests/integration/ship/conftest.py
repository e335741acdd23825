import pytest


@pytest.fixture(scope="session")
def app_route_paths() -> set[str]:
    """Paths the real app serves, read from the app factory (no second list to keep in sync)."""
    from lnarize_serve.app import create_app
    from lnarize_serve.settings import Settings

    app = create_app(Settings())
    return {route.path for route in app.routes}

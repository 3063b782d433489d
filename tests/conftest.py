import os

# Set before Ray or MLflow are imported anywhere in the test session.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray 2.60's default for a local ray.init, set explicitly

# The search's state-signing key (orchestrator/stages/search_state.py) goes to a throwaway config dir, not
# the user's ~/.config/ddray: set before any driver, worker or CLI subprocess starts (they inherit it).
if "DDRAY_STATE_KEY" not in os.environ:
    import tempfile

    os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="ddray-test-config-")

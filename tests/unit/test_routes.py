from sluicegate.proxy.routes import RouteKind, match_route


def test_deployment_routes_with_and_without_prefix() -> None:
    for path in (
        "/openai/deployments/gpt-4o/chat/completions",
        "/deployments/gpt-4o/chat/completions",
    ):
        route = match_route("POST", path)
        assert route.kind is RouteKind.DEPLOYMENT
        assert route.deployment == "gpt-4o"
        assert route.operation == "chat/completions"
        assert route.metered


def test_v1_routes_take_the_deployment_from_the_body() -> None:
    for op in ("chat/completions", "embeddings", "responses"):
        route = match_route("POST", f"/openai/v1/{op}")
        assert route.kind is RouteKind.V1
        assert route.deployment is None
        assert route.upstream_suffix == f"v1/{op}"


def test_models_listing_and_passthrough() -> None:
    assert match_route("GET", "/openai/v1/models").kind is RouteKind.MODELS
    assert match_route("GET", "/openai/models").kind is RouteKind.MODELS
    files = match_route("GET", "/openai/v1/files")
    assert files.kind is RouteKind.PASSTHROUGH
    assert files.upstream_suffix == "v1/files"
    assert not files.metered


def test_unknown_paths() -> None:
    assert match_route("POST", "/v2/chat").kind is RouteKind.NOT_FOUND
    assert match_route("POST", "/openai/deployments/x").kind is RouteKind.NOT_FOUND
    assert match_route("POST", "/openai/").kind is RouteKind.NOT_FOUND


def test_a_metered_operation_takes_only_post() -> None:
    """Azure has no GET or DELETE of chat/completions: "Resource not found", as for any wrong
    path, rather than a complaint about the missing JSON body. Other deployment operations
    keep every method (they are passed through)."""
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        for op in ("chat/completions", "completions", "embeddings", "responses"):
            route = match_route(method, f"/openai/deployments/gpt-4o/{op}")
            assert route.kind is RouteKind.NOT_FOUND, (method, op)
        other = match_route(method, "/openai/deployments/gpt-4o/audio/speech")
        assert other.kind is RouteKind.DEPLOYMENT and not other.metered

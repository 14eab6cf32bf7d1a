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


def test_paths_a_backend_could_read_as_a_metered_operation_are_refused() -> None:
    """Only metered routes are checked against the configuration; anything else is
    forwarded as the client wrote it, unmetered. A backend that reads a path more loosely
    (letter case, dot or empty segments, a "?" or "%" left after decoding, ";" parameters)
    could serve these as a chat completion outside the limits and the ledger."""
    for path in (
        "/openai/deployments/gpt-4o/Chat/Completions",
        "/openai/Deployments/gpt-4o/chat/completions",
        "/openai/V1/chat/completions",
        "/openai/v1/Embeddings/",
        "/openai/deployments/gpt-4o/./chat/completions",
        "/openai/deployments/gpt-4o//chat/completions",
        "/openai/v1/./responses",
        "/openai/v1/x/../chat/completions",
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&",
        "/openai/deployments/gpt-4o/chat%2Fcompletions",
        "/openai/deployments/gpt-4o/chat/completions;v=1",
        "/openai/deployments/gpt-4o/chat completions",
        "/openai/deployments/gpt-4o/chat\\completions",
        "/openai/chat/completions",
        "/openai/deployments/gpt-4o/extensions/chat/completions",
        "/openai/v1/deployments/gpt-4o/embeddings",
    ):
        assert match_route("POST", path).kind is RouteKind.REFUSED, path
    # Not only POSTs: characters and segments a backend may read differently, for any method.
    for path in (
        "/openai/files/f\u00e9",
        "/openai/files/a b",
        "/openai/files/%41",
        "/openai//files",
    ):
        assert match_route("GET", path).kind is RouteKind.REFUSED, path


def test_other_operations_are_still_passed_through() -> None:
    for method, path, kind in (
        ("GET", "/openai/v1/files/file-abc123/content", RouteKind.PASSTHROUGH),
        ("GET", "/openai/v1/chat/completions", RouteKind.PASSTHROUGH),  # stored completions
        ("POST", "/openai/v1/chat/completions/chatcmpl-1", RouteKind.PASSTHROUGH),
        ("DELETE", "/openai/v1/responses/resp_1", RouteKind.PASSTHROUGH),
        ("POST", "/openai/v1/fine_tuning/jobs/ftjob-1/cancel", RouteKind.PASSTHROUGH),
        ("POST", "/openai/deployments/gpt-4.1/audio/transcriptions", RouteKind.DEPLOYMENT),
        ("POST", "/openai/deployments/gpt-4o/chat/completions/", RouteKind.DEPLOYMENT),
    ):
        assert match_route(method, path).kind is kind, (method, path)


def test_a_stored_response_named_in_another_letter_case_is_refused() -> None:
    """Responses affinity guards a stored response by its id: another subscription naming it
    gets 404 and no backend is asked. The guard reads the id from ``responses/{id}`` in the
    SDKs' spelling; a backend that reads paths case-insensitively would serve
    ``Responses/{id}`` or ``V1/responses/{id}`` too, so those spellings are refused rather
    than forwarded past the guard."""
    for method in ("GET", "DELETE", "POST"):
        for path in (
            "/openai/v1/Responses/resp_1",
            "/openai/V1/responses/resp_1",
            "/openai/RESPONSES/resp_1/input_items",
            "/openai/Deployments/gpt-4o/responses/resp_1",
            "/openai/deployments/gpt-4o/Responses/resp_1",
            "/openai/v1/rESPONSES/resp_1/cancel",
        ):
            assert match_route(method, path).kind is RouteKind.REFUSED, (method, path)
    # The SDKs' spelling is still forwarded, with the id the guard reads (ids keep their case).
    for path in ("/openai/v1/responses/resp_AbC", "/openai/responses/resp_AbC/input_items"):
        route = match_route("GET", path)
        assert (route.kind, route.response_id) == (RouteKind.PASSTHROUGH, "resp_AbC"), path
    route = match_route("GET", "/openai/deployments/Gpt-4O/responses/resp_AbC")
    assert (route.kind, route.response_id) == (RouteKind.DEPLOYMENT, "resp_AbC")

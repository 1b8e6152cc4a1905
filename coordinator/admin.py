"""The coordinator's admin HTTP API (aiohttp; 127.0.0.1:8001 by default). Torch-free.

    GET  /v1/cluster               workers (role, shape, state, load), leader, policy, SLOs, recent events
    POST /v1/workers/{id}/drain    no new work for that worker (kept in etcd: every replica honours it)
    GET  /v1/profiles              cost models (etcd profiles/, and what live workers measured)
    PUT  /v1/profiles/{model}/{shape}  store a measured cost model (`cluster profile`; leader only)
    POST /v1/plan                  capacity planning: replicas and TP per phase for a workload and SLOs
                                   (coordinator/planner.py; 422 for an impossible budget)
    GET  /metrics                  Prometheus
    GET  /health                   200 while the process serves (with is_leader)
    GET  /openapi.json             this API's OpenAPI 3.1 description
Errors have the OpenAI shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from aiohttp import web

from common.metrics import CONTENT_TYPE


def error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
          param: str | None = None, headers=None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": param, "code": code}},
                             status=status, headers=headers)


_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

ADMIN_OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "tandem coordinator admin API", "version": "1"},
    "paths": {
        "/v1/cluster": {"get": {"summary": "The cluster's live view", "responses": {
            "200": {"description": "workers, leader, policy, SLOs", "content": {"application/json": {
                "schema": {"type": "object", "required": ["cluster", "is_leader", "workers"]}}}}}}},
        "/v1/workers/{worker_id}/drain": {"post": {
            "summary": "Stop giving a worker new work",
            "parameters": [{"name": "worker_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "draining"},
                          "404": {"description": "no such worker",
                                  "content": {"application/json": {"schema": _ERROR}}}}}},
        "/v1/profiles": {"get": {"summary": "Cost models by model and worker shape",
                                 "responses": {"200": {"description": "profiles"}}}},
        "/v1/plan": {"post": {
            "summary": "Capacity plan: prefill/decode replicas and TP for a workload, SLOs and a device budget "
                       "(or the rate a given cluster holds)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["workload", "slo"],
                "properties": {"workload": {"type": "object", "description": "single-turn ({rate, prompt_tokens, "
                                            "output_tokens, ...}) or {conversations: {rate, turns, ...}}"},
                               "slo": {"type": "object"}, "budget": {"type": "object"}, "cluster": {"type": "object"},
                               "prefix_caching": {"type": "boolean"}}}}}},
            "responses": {"200": {"description": "the plan"},
                          "400": {"description": "invalid JSON", "content": {"application/json": {"schema": _ERROR}}},
                          "422": {"description": "impossible budget or bad field",
                                  "content": {"application/json": {"schema": _ERROR}}}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
        "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
    },
    "components": {"schemas": {"Error": _ERROR}},
}


def build_app(coord) -> web.Application:
    app = web.Application(client_max_size=1 << 20)

    async def cluster(request):
        return web.json_response(coord.cluster_status())

    async def drain(request):
        wid = request.match_info["worker_id"]
        try:
            ok = await coord.drain(wid)
        except Exception as e:  # etcd unavailable
            return error(503, f"cannot record the drain in etcd: {e}", "service_unavailable")
        if not ok:
            return error(404, f"no worker {wid!r} in this cluster", code="worker_not_found", param="worker_id")
        return web.json_response({"worker_id": wid, "state": "draining"})

    async def profiles(request):
        try:
            return web.json_response(await coord.profiles())
        except Exception as e:
            return error(503, f"etcd unavailable: {e}", "service_unavailable")

    async def put_profile(request):
        import json

        from coordinator.policy import DecodeCost, PrefillCost
        model, shape = request.match_info["model"], request.match_info["shape"]
        try:
            body = json.loads(await request.read())
            prof = {}
            if "prefill" in body:
                prof["prefill"] = {k: float(v) for k, v in body["prefill"].items()}
                PrefillCost(**prof["prefill"])
            if "decode" in body:
                prof["decode"] = {k: float(v) for k, v in body["decode"].items()}
                DecodeCost(**prof["decode"])
            if not prof:
                raise ValueError("give a prefill and/or a decode cost model")
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
            return error(400, f"not a profile: {e}", code="invalid_profile")
        try:
            ok = await coord.store_profile(model, shape, {**prof, "source": body.get("source", "cluster profile")})
        except Exception as e:
            return error(503, f"etcd unavailable: {e}", "service_unavailable")
        if not ok:
            return error(409, "this coordinator is not the leader; send it to the leader",
                         code="not_leader", headers={"X-Leader": (coord.leader_info.admin if coord.leader_info else "")})
        return web.json_response({"model": model, "shape": shape, **prof})

    async def plan(request):
        import asyncio
        import json

        from coordinator.planner import PlanError
        from coordinator.planner import plan as make_plan
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            return error(400, f"the body is not valid JSON: {e}", code="invalid_json")
        try:
            profiles = await coord.profiles()
        except Exception:  # etcd unavailable: plan with the default cost models
            profiles = {}
        try:
            return web.json_response(await asyncio.to_thread(make_plan, body, profiles))
        except PlanError as e:
            return error(422, str(e), code="invalid_plan_request", param=e.param)

    async def metrics(request):
        return web.Response(body=coord.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def health(request):
        return web.json_response({"status": "ok", "is_leader": coord.is_leader,
                                  "coordinator_id": coord.config.coordinator_id})

    async def openapi(request):
        return web.json_response(ADMIN_OPENAPI)

    @web.middleware
    async def errors(request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error(e.status, e.reason or "error", "invalid_request_error" if e.status < 500 else "server_error")

    app.middlewares.append(errors)
    app.router.add_get("/v1/cluster", cluster)
    app.router.add_post("/v1/workers/{worker_id}/drain", drain)
    app.router.add_get("/v1/profiles", profiles)
    app.router.add_post("/v1/plan", plan)
    app.router.add_put("/v1/profiles/{model}/{shape}", put_profile)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    app.router.add_get("/openapi.json", openapi)
    return app

"""A small asynchronous client of Label Studio's REST API: the calls the bridge makes, and nothing else.

Authentication takes either kind of Label Studio token: a legacy API token (sent as `Token …`) or a personal
access token (a JWT, exchanged at `/api/token/refresh/` for a 5-minute access token, sent as `Bearer …` and
exchanged again when refused). Every failure is a `LabelStudioError` naming the call and Label Studio's answer,
cut short; responses are read up to `MAX_RESPONSE_BYTES`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import aiohttp

from schemas.errors import VlmflowError

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
"""A page of tasks with their annotations can be large; anything above this is refused."""
PAGE_SIZE = 100
REQUEST_TIMEOUT_S = 30.0
JWT_PARTS = 3


class LabelStudioError(VlmflowError):
    """Label Studio did not answer, refused the credentials, or answered a call with an error (`status`)."""

    def __init__(self, message: str, *, status: int | None = None):
        self.status = status
        super().__init__(message)


def updated_after_query(cursor: datetime) -> str:
    """A Data Manager query for tasks updated after `cursor` (UTC). Label Studio wants the `.000Z` form."""
    value = cursor.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    item = {"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime", "value": value}
    return json.dumps({"filters": {"conjunction": "and", "items": [item]}, "ordering": ["tasks:updated_at"]})


def case_id_query(case_id: str) -> str:
    """A Data Manager query for the tasks whose data names `case_id`."""
    item = {"filter": "filter:tasks:data.case_id", "operator": "equal", "type": "String", "value": case_id}
    return json.dumps({"filters": {"conjunction": "and", "items": [item]}})


class LabelStudioClient:
    """One session to one Label Studio; use as `async with LabelStudioClient(url, token) as client:`."""

    def __init__(self, url: str, token: str, *, timeout_s: float = REQUEST_TIMEOUT_S):
        self.url = url.rstrip("/")
        self._token = token
        self._personal = token.count(".") == JWT_PARTS - 1
        self._access: str | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> LabelStudioClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            await self._session.close()

    # -- transport ------------------------------------------------------------------------------------------
    async def _authorization(self, *, fresh: bool = False) -> str:
        if not self._personal:
            return f"Token {self._token}"
        if self._access is None or fresh:
            answer = await self._send("POST", "/api/token/refresh/", {"refresh": self._token}, authorization=None)
            if not isinstance(answer, dict) or not isinstance(answer.get("access"), str):
                raise LabelStudioError("POST /api/token/refresh/: no access token in the answer")
            self._access = answer["access"]
        return f"Bearer {self._access}"

    async def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        authorization: str | None,
    ) -> Any:
        assert self._session is not None, "use the client as `async with`"
        headers = {"Accept": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        call = f"{method} {path}"
        try:
            async with self._session.request(
                method, self.url + path, json=body, params=params, headers=headers
            ) as response:
                status = response.status
                chunks, size = [], 0
                async for chunk in response.content.iter_chunked(1024 * 1024):
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        raise LabelStudioError(f"{call}: answer larger than {MAX_RESPONSE_BYTES} bytes")
                    chunks.append(chunk)
                raw = b"".join(chunks)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LabelStudioError(
                f"{call}: Label Studio at {self.url} does not answer ({exc or type(exc).__name__})"
            ) from None
        if status == 401:
            raise _Unauthorized(f"{call}: Label Studio refused the API token (401)", status=status)
        if status >= 400:
            text = raw.decode(errors="replace").replace("\n", " ")[:300]
            raise LabelStudioError(f"{call}: HTTP {status}: {text}", status=status)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise LabelStudioError(f"{call}: the answer is not JSON") from None

    async def request(self, method: str, path: str, body: Any = None, *, params: dict[str, str] | None = None) -> Any:
        """One API call; a personal access token's short-lived access token is exchanged again once if refused."""
        try:
            return await self._send(method, path, body, params=params, authorization=await self._authorization())
        except _Unauthorized:
            if not self._personal:
                raise
        return await self._send(method, path, body, params=params, authorization=await self._authorization(fresh=True))

    # -- the calls ------------------------------------------------------------------------------------------
    async def health(self) -> None:
        await self._send("GET", "/health", authorization=None)

    async def projects(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        page = 1
        while True:
            answer = await self.request("GET", "/api/projects/", params={"page": str(page), "page_size": "100"})
            results = answer.get("results", []) if isinstance(answer, dict) else answer
            found += results
            if not isinstance(answer, dict) or not answer.get("next"):
                return found
            page += 1

    async def create_project(self, title: str, label_config: str, description: str) -> dict[str, Any]:
        body = {"title": title, "label_config": label_config, "description": description}
        result: dict[str, Any] = await self.request("POST", "/api/projects/", body)
        return result

    async def update_project(self, project_id: int, fields: dict[str, Any]) -> None:
        await self.request("PATCH", f"/api/projects/{project_id}/", fields)

    async def s3_storages(self, project_id: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request(
            "GET", "/api/storages/s3/", params={"project": str(project_id)}
        )
        return result

    async def create_s3_storage(self, fields: dict[str, Any]) -> None:
        await self.request("POST", "/api/storages/s3/", fields)

    async def update_s3_storage(self, storage_id: int, fields: dict[str, Any]) -> None:
        await self.request("PATCH", f"/api/storages/s3/{storage_id}", fields)

    async def webhooks(self, project_id: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request("GET", "/api/webhooks/", params={"project": str(project_id)})
        return result

    async def create_webhook(self, fields: dict[str, Any]) -> None:
        await self.request("POST", "/api/webhooks/", fields)

    async def update_webhook(self, webhook_id: int, fields: dict[str, Any]) -> None:
        await self.request("PATCH", f"/api/webhooks/{webhook_id}/", fields)

    async def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> int:
        """Import tasks with their predictions in one call; returns how many Label Studio created."""
        answer = await self.request("POST", f"/api/projects/{project_id}/import", tasks)
        return int(answer.get("task_count", 0)) if isinstance(answer, dict) else 0

    async def tasks(self, project_id: int, query: str) -> list[dict[str, Any]]:
        """Every task of the project that `query` (a Data Manager query) selects, with its annotations."""
        found: list[dict[str, Any]] = []
        page = 1
        while True:
            params = {"project": str(project_id), "fields": "all", "query": query, "page": str(page),
                      "page_size": str(PAGE_SIZE)}  # fmt: skip
            answer = await self.request("GET", "/api/tasks/", params=params)
            batch = answer.get("tasks", []) if isinstance(answer, dict) else []
            found += batch
            total = int(answer.get("total", 0)) if isinstance(answer, dict) else 0
            if not batch or len(found) >= total:
                return found
            page += 1

    async def task(self, task_id: int) -> dict[str, Any] | None:
        """The task, or None when it was deleted."""
        try:
            result: dict[str, Any] = await self.request("GET", f"/api/tasks/{task_id}/")
        except LabelStudioError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    async def update_task_data(self, task_id: int, data: dict[str, Any]) -> None:
        await self.request("PATCH", f"/api/tasks/{task_id}/", {"data": data})

    async def delete_task(self, task_id: int) -> None:
        await self.request("DELETE", f"/api/tasks/{task_id}/")


class _Unauthorized(LabelStudioError):
    """401: the token was refused (a personal access token's access token may just have expired)."""

# An OTLP/HTTP trace receiver for the tests, decoding with the reference generated classes of the
# `opentelemetry-proto` package. It prints its port on stdout's first line, then serves:
#
# - POST …/v1/traces (application/x-protobuf): decodes an ExportTraceServiceRequest and answers
#   200 with an empty ExportTraceServiceResponse. A request whose body does not decode, or holds
#   fields the schema does not know (a wrong field number), is answered 400 and recorded as an
#   error. Under /busy/… the first request of each path is answered 503 with Retry-After: 1.
# - GET /spans: every decoded span as JSON (ids in hex; kind and status code by name; attributes
#   as a dict; the span's resource attributes and scope).
# - GET /requests: each trace request: path, content type, headers, span count, error.
# - POST anything else: an HTTP kind's endpoint: records {path, webhook_id, traceparent, call}
#   and answers 200, but 500 to the first call of each job under /flaky. GET /calls lists them.
#
# Arguments (the secrets and results files of the shared receiver helper) are not used.

import http.server
import json
import threading

from google.protobuf import unknown_fields
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

lock = threading.Lock()
spans, requests, calls = [], [], []
busy_seen, calls_seen = set(), {}


def unknown(msg, path="request"):
    """Paths of fields the schema does not know, anywhere in msg."""
    out = []
    if len(unknown_fields.UnknownFieldSet(msg)):
        out.append(path)
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        # `is_repeated` in protobuf 6 and later, `label` before.
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            for i, v in enumerate(value):
                out += unknown(v, f"{path}.{field.name}[{i}]")
        else:
            out += unknown(value, f"{path}.{field.name}")
    return out


def any_value(v):
    which = v.WhichOneof("value")
    if which in ("string_value", "int_value", "bool_value", "double_value"):
        return getattr(v, which)
    return {"unexpected": str(which)}


def attrs(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def span_json(s, resource, scope):
    return {
        "trace_id": s.trace_id.hex(),
        "span_id": s.span_id.hex(),
        "parent_span_id": s.parent_span_id.hex(),
        "name": s.name,
        "kind": trace_pb2.Span.SpanKind.Name(s.kind),
        "start": s.start_time_unix_nano,
        "end": s.end_time_unix_nano,
        "flags": s.flags,
        "attributes": attrs(s.attributes),
        "links": [{"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex(), "flags": l.flags} for l in s.links],
        "status": {
            "set": s.HasField("status"),
            "code": trace_pb2.Status.StatusCode.Name(s.status.code),
            "message": s.status.message,
        },
        "resource": resource,
        "scope": scope,
    }


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body=b"", content_type="application/json", headers=()):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with lock:
            data = {"/spans": spans, "/requests": requests, "/calls": calls}.get(self.path)
            body = None if data is None else json.dumps(data).encode()
        if body is None:
            self.answer(404)
        else:
            self.answer(200, body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path.endswith("/v1/traces"):
            self.traces(body)
        else:
            self.call()

    def traces(self, body):
        record = {
            "path": self.path,
            "content_type": self.headers.get("content-type"),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "spans": 0,
            "error": None,
        }
        if self.path.startswith("/busy/"):
            with lock:
                first = self.path not in busy_seen
                busy_seen.add(self.path)
            if first:
                record["error"] = "answered busy"
                with lock:
                    requests.append(record)
                self.answer(503, b"busy", "text/plain", [("retry-after", "1")])
                return
        decoded = []
        try:
            req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            bad = unknown(req)
            if bad:
                raise ValueError("unknown fields at " + ", ".join(bad))
            for rs in req.resource_spans:
                resource = attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    scope = {"name": ss.scope.name, "version": ss.scope.version}
                    decoded += [span_json(s, resource, scope) for s in ss.spans]
        except Exception as e:
            record["error"] = f"{type(e).__name__}: {e}"
        record["spans"] = len(decoded)
        with lock:
            requests.append(record)
            spans.extend(decoded)
        if record["error"]:
            self.answer(400, record["error"].encode(), "text/plain")
        else:
            response = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.answer(200, response, "application/x-protobuf")

    def call(self):
        wid = self.headers.get("webhook-id")
        with lock:
            n = calls_seen.get((self.path, wid), 0) + 1
            calls_seen[(self.path, wid)] = n
            calls.append({"path": self.path, "webhook_id": wid, "traceparent": self.headers.get("traceparent"), "call": n})
        if self.path.startswith("/flaky") and n == 1:
            self.answer(500, b"try again", "text/plain")
        else:
            self.answer(200, b"ok", "text/plain")

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()

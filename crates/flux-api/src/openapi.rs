//! The OpenAPI 3.1 description served at `/openapi.json`.

use serde_json::{Value, json};

/// The document.
pub fn document() -> Value {
    let error = json!({ "$ref": "#/components/schemas/Error" });
    let err = |description: &str| json!({ "description": description, "content": { "application/json": { "schema": error } } });
    let id_param =
        json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }]);
    let submit_errors = |mut map: serde_json::Map<String, Value>| {
        for (code, text) in [
            (
                "400",
                "Invalid parameters: the error names the field, the value and what is allowed",
            ),
            ("401", "Missing or invalid x-api-key"),
            ("403", "The key may not use this model"),
            ("404", "Unknown model"),
            ("406", "Not enough credits"),
            ("413", "Request body too large"),
            ("429", "Rate limited or queue full (see Retry-After)"),
            ("502", "The image URL could not be fetched"),
            ("504", "Fetching the image URL timed out"),
        ] {
            map.insert(code.into(), err(text));
        }
        Value::Object(map)
    };
    let mut v1 = serde_json::Map::new();
    v1.insert(
        "200".into(),
        json!({
            "description": "The image (image/jpeg unless image_format says otherwise), or JSON with `image` in base64 when base64 is true",
            "content": {
                "image/jpeg": { "schema": { "type": "string", "format": "binary" } },
                "image/png": { "schema": { "type": "string", "format": "binary" } },
                "image/webp": { "schema": { "type": "string", "format": "binary" } },
                "application/json": { "schema": { "$ref": "#/components/schemas/Result" } }
            }
        }),
    );
    v1.insert("422".into(), err("The job failed"));
    let mut v2 = serde_json::Map::new();
    v2.insert(
        "200".into(),
        json!({ "description": "Queued", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Submitted" } } } }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "flux-kernels job API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Flux.1 img2img, compatible with the hosted API: synchronous under /v1, queued under /v2."
        },
        "components": {
            "securitySchemes": { "apiKey": { "type": "apiKey", "in": "header", "name": "x-api-key" } },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } },
                "Img2ImgRequest": {
                    "type": "object",
                    "required": ["prompt", "image"],
                    "properties": {
                        "prompt": { "type": "string", "minLength": 1 },
                        "image": { "type": "string", "description": "http(s) URL, data: URI or raw base64 (PNG, JPEG, WebP)" },
                        "steps": { "type": "integer", "minimum": 1, "maximum": crate::request::MAX_STEPS, "default": crate::request::DEFAULT_STEPS },
                        "seed": { "type": "integer", "minimum": 0, "default": crate::request::DEFAULT_SEED },
                        "denoise": { "type": "number", "minimum": 0, "maximum": 1, "default": crate::request::DEFAULT_DENOISE, "description": format!("0 returns the input; otherwise steps / denoise must be at most {} (the schedule is computed for that many steps)", flux_schedulers::MAX_STEPS) },
                        "scheduler": { "type": "string", "enum": flux_schedulers::Scheduler::ALL.iter().map(|s| s.name()).collect::<Vec<_>>(), "default": "simple", "description": "kl_optimal needs a schedule of at least 2 steps (steps / denoise >= 2, or a sampler that drops the penultimate sigma)" },
                        "sampler_name": { "type": "string", "enum": flux_samplers::Sampler::ALL.iter().map(|s| s.name()).collect::<Vec<_>>(), "default": "euler" },
                        "base64": { "type": "boolean", "default": false },
                        "image_format": { "type": "string", "enum": ["png", "jpeg", "webp"], "default": "jpeg" }
                    }
                },
                "Submitted": {
                    "type": "object",
                    "properties": {
                        "request_id": { "type": "string" },
                        "status": { "const": "QUEUED" },
                        "status_url": { "type": "string", "format": "uri" },
                        "response_url": { "type": "string", "format": "uri" }
                    }
                },
                "Status": {
                    "type": "object",
                    "properties": {
                        "request_id": { "type": "string" },
                        "status": { "type": "string", "enum": ["QUEUED", "PROCESSING", "COMPLETED", "FAILED"] },
                        "progress": { "type": "object", "properties": { "step": { "type": "integer" }, "total": { "type": "integer" }, "message": { "type": "string" } } },
                        "error": { "type": "string" }
                    }
                },
                "Result": {
                    "type": "object",
                    "properties": {
                        "request_id": { "type": "string" },
                        "status": { "type": "string" },
                        "output": { "type": ["string", "null"], "description": "base64 image, or a URL under this server" },
                        "metrics": { "type": "object", "properties": { "inference_time": { "type": ["number", "null"] }, "queue_time": { "type": ["number", "null"] } } },
                        "metadata": { "type": "object" },
                        "error": { "type": "string" }
                    }
                }
            }
        },
        "security": [{ "apiKey": [] }],
        "paths": {
            "/v1/flux-img2img": { "post": {
                "summary": "Run img2img and wait for the image",
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Img2ImgRequest" } } } },
                "responses": submit_errors(v1)
            } },
            "/v2/flux-img2img": { "post": {
                "summary": "Queue an img2img job",
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Img2ImgRequest" } } } },
                "responses": submit_errors(v2)
            } },
            "/v2/requests/{id}/status": { "get": {
                "summary": "Job status (progress while PROCESSING)",
                "parameters": id_param,
                "responses": {
                    "200": { "description": "Status", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Status" } } } },
                    "401": err("Missing or invalid x-api-key"),
                    "404": err("Unknown or expired request id"),
                    "422": { "description": "The job FAILED", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Status" } } } }
                }
            } },
            "/v2/requests/{id}": { "get": {
                "summary": "Final result",
                "parameters": id_param,
                "responses": {
                    "200": { "description": "Result", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Result" } } } },
                    "401": err("Missing or invalid x-api-key"),
                    "404": err("Unknown or expired request id"),
                    "422": { "description": "The job FAILED", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Result" } } } }
                }
            } },
            "/v2/requests/{id}/output": { "get": {
                "summary": "The output image of a COMPLETED job",
                "security": [],
                "parameters": id_param,
                "responses": { "200": { "description": "The image" }, "404": err("No output") }
            } },
            "/healthz": { "get": { "summary": "Liveness", "security": [], "responses": { "200": { "description": "OK" } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "security": [], "responses": { "200": { "description": "text/plain exposition" } } } },
            "/openapi.json": { "get": { "summary": "This document", "security": [], "responses": { "200": { "description": "OpenAPI" } } } }
        }
    })
}

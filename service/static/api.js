// The HTTP API as the page uses it: every failure becomes an ApiError carrying the server's own
// message ({"error": {"code", "message"}}), so the page can always say what went wrong.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status; // 0: the request never got an answer
    this.code = code;
  }
}

// API paths are written as the server names them ("/v1/models"); they are resolved against the
// page's own URL so that a proxy prefix in front of the page applies to them too.
export function apiUrl(path) {
  return new URL(path.replace(/^\//, ""), document.baseURI).href;
}

export class Api {
  constructor() {
    this.key = null; // in memory only: gone with the page, never in a URL or in storage
  }

  headers() {
    return this.key ? { Authorization: `Bearer ${this.key}` } : {};
  }

  async request(path, init = {}) {
    let response;
    try {
      response = await fetch(apiUrl(path), { ...init, headers: { ...this.headers(), ...init.headers } });
    } catch (error) {
      throw new ApiError(0, "network_error", `could not reach the server (${error.message})`);
    }
    if (response.ok) return response;
    throw await errorOf(response);
  }

  async json(path, init) {
    const response = await this.request(path, init);
    return response.json();
  }

  async blob(path) {
    const response = await this.request(path);
    return response.blob();
  }

  // One classification: multipart, so an image file goes as it is (no base64), with the timing
  // the browser measured around it.
  async classify(fields) {
    const form = new FormData();
    for (const [name, value] of Object.entries(fields)) {
      if (value === null || value === undefined || value === "") continue;
      if (value instanceof Blob) form.append(name, value, value.name || "image");
      else form.append(name, String(value));
    }
    const started = performance.now();
    const body = await this.json("/v1/classify", { method: "POST", body: form });
    return { body, roundTripMs: performance.now() - started };
  }
}

async function errorOf(response) {
  const text = await response.text().catch(() => "");
  try {
    const { error } = JSON.parse(text);
    if (error && typeof error === "object" && error.message) {
      return new ApiError(response.status, error.code || "error", error.message);
    }
    if (typeof error === "string") return new ApiError(response.status, "error", error);
  } catch {
    // not JSON (a proxy's HTML page, say): show what came back, briefly
  }
  const snippet = text.trim().slice(0, 200) || response.statusText || "no message";
  return new ApiError(response.status, "http_error", snippet);
}

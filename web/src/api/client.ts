// The typed API client. Types come from openapi/openapi.json (`npm run gen`), so
// a change to the server's API breaks this build, not the user's browser.
// The session rides in the server's HttpOnly `sluice_token` cookie.
import createClient from "openapi-fetch";
import type { components, paths } from "./schema";

export type Schemas = components["schemas"];
export type Channel = Schemas["Channel"];
export type Release = Schemas["Release"];
export type Device = Schemas["Device"];
export type DeviceDetail = Schemas["DeviceDetail"];
export type Product = Schemas["Product"];
export type HistoryEntry = Schemas["HistoryEntry"];
export type AuditEntry = Schemas["AuditEntry"];
export type TokenInfo = Schemas["TokenInfo"];
export type ChannelStats = Schemas["ChannelStats"];
export type Role = Schemas["Role"];

export const api = createClient<paths>({ baseUrl: "", credentials: "same-origin" });

/** An API refusal: `detail` is the problem+json message the server wrote for people. */
export class ApiError extends Error {
  constructor(
    public status: number,
    public detail: string,
  ) {
    super(detail);
  }
}

/** Called on any 401, so an expired session lands on the sign-in page. */
let onUnauthorized: () => void = () => {};
export function setUnauthorizedHandler(f: () => void) {
  onUnauthorized = f;
}

/**
 * Unwraps an openapi-fetch answer: the data, or an ApiError carrying the
 * problem+json `detail` (or a plain description when the body is not one).
 */
export async function unwrap<T>(
  p: Promise<{ data?: T; error?: unknown; response: Response }>,
): Promise<T> {
  let r;
  try {
    r = await p;
  } catch {
    throw new ApiError(0, "the server cannot be reached: check that sluice is running");
  }
  if (r.response.ok) return r.data as T;
  const e = r.error as { detail?: string } | string | undefined;
  const detail =
    typeof e === "object" && e && typeof e.detail === "string"
      ? e.detail
      : `${r.response.status} ${r.response.statusText}`;
  if (r.response.status === 401) onUnauthorized();
  throw new ApiError(r.response.status, detail);
}

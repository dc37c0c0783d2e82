// Who is signed in. The token itself lives in the HttpOnly cookie the server
// sets; the browser keeps only the name and role (for showing or hiding
// controls; the server checks every request anyway) until the token expires.
import { createContext, useCallback, useContext, useEffect, useMemo, useState, type ReactNode } from "react";
import { api, setUnauthorizedHandler, unwrap, type Role } from "./api/client";

export interface Session {
  username: string;
  role: Role;
  expires_at: string;
}

const KEY = "sluice.session";

function stored(): Session | null {
  try {
    const s = JSON.parse(localStorage.getItem(KEY) ?? "null") as Session | null;
    return s && new Date(s.expires_at) > new Date() ? s : null;
  } catch {
    return null;
  }
}

interface Ctx {
  session: Session | null;
  isAdmin: boolean;
  login(username: string, password: string): Promise<void>;
  logout(): Promise<void>;
}

const SessionContext = createContext<Ctx | null>(null);

export function SessionProvider({ children }: { children: ReactNode }) {
  const [session, setSession] = useState<Session | null>(stored);
  const forget = useCallback(() => {
    localStorage.removeItem(KEY);
    setSession(null);
  }, []);
  useEffect(() => setUnauthorizedHandler(forget), [forget]);

  const login = useCallback(async (username: string, password: string) => {
    const r = await unwrap(api.POST("/v1/auth/login", { body: { username, password } }));
    const s = { username, role: r.role, expires_at: r.expires_at };
    localStorage.setItem(KEY, JSON.stringify(s));
    setSession(s);
  }, []);
  const logout = useCallback(async () => {
    try {
      await api.POST("/v1/auth/logout");
    } finally {
      forget();
    }
  }, [forget]);

  const value = useMemo(
    () => ({ session, isAdmin: session?.role === "admin", login, logout }),
    [session, login, logout],
  );
  return <SessionContext.Provider value={value}>{children}</SessionContext.Provider>;
}

export function useSession(): Ctx {
  const c = useContext(SessionContext);
  if (!c) throw new Error("useSession outside SessionProvider");
  return c;
}

import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { BrowserRouter, Navigate, NavLink, Route, Routes, useLocation, useSearchParams } from "react-router";
import { SessionProvider, useSession } from "./session";
import { NoticeProvider } from "./ui";
import { Login } from "./pages/Login";
import { Overview } from "./pages/Overview";
import { ChannelPage } from "./pages/Channel";
import { Releases, ReleasePage } from "./pages/Releases";
import { Devices, DevicePage } from "./pages/Devices";
import { Tokens } from "./pages/Tokens";
import { Keys } from "./pages/Keys";
import { Audit } from "./pages/Audit";
import "./styles.css";

/** Once signed in, the sign-in page sends on to the page first asked for. */
function AfterLogin() {
  const [params] = useSearchParams();
  const next = params.get("next");
  return <Navigate to={next && next.startsWith("/") && !next.startsWith("//") && !next.startsWith("/login") ? next : "/"} replace />;
}

function Shell() {
  const { session, isAdmin, logout } = useSession();
  const location = useLocation();
  if (!session) {
    const next = location.pathname + location.search;
    return (
      <Routes>
        <Route path="/login" element={<Login />} />
        <Route path="*" element={<Navigate to={`/login?next=${encodeURIComponent(next)}`} replace />} />
      </Routes>
    );
  }
  return (
    <>
      <header className="top">
        <NavLink to="/" className="brand">
          Sluice
        </NavLink>
        <nav>
          <NavLink to="/" end>
            Fleet
          </NavLink>
          <NavLink to="/releases">Releases</NavLink>
          <NavLink to="/devices">Devices</NavLink>
          <NavLink to="/keys">Keys</NavLink>
          {isAdmin && <NavLink to="/tokens">API tokens</NavLink>}
          {isAdmin && <NavLink to="/audit">Audit log</NavLink>}
        </nav>
        <div className="who">
          <span className="user">
            {session.username} <span className={`role role-${session.role}`}>{session.role}</span>
          </span>
          <button className="link" onClick={() => void logout()}>
            Sign out
          </button>
        </div>
      </header>
      <NoticeProvider>
        <main>
          <Routes>
            <Route path="/" element={<Overview />} />
            <Route path="/login" element={<AfterLogin />} />
            <Route path="/products/:product/channels/:channel" element={<ChannelPage />} />
            <Route path="/releases" element={<Releases />} />
            <Route path="/releases/:product/:version" element={<ReleasePage />} />
            <Route path="/devices" element={<Devices />} />
            <Route path="/devices/:id" element={<DevicePage />} />
            <Route path="/keys" element={<Keys />} />
            <Route path="/tokens" element={<Tokens />} />
            <Route path="/audit" element={<Audit />} />
            <Route path="*" element={<p className="error">No such page.</p>} />
          </Routes>
        </main>
      </NoticeProvider>
    </>
  );
}

createRoot(document.getElementById("root")!).render(
  <StrictMode>
    <BrowserRouter>
      <SessionProvider>
        <Shell />
      </SessionProvider>
    </BrowserRouter>
  </StrictMode>,
);

import { defineConfig } from "vite";
import react from "@vitejs/plugin-react";

// `npm run dev` proxies the API to a running `sluice serve` (SLUICE_URL, default :8080),
// so the dashboard is developed against the real server, cookie and all.
const api = process.env.SLUICE_URL ?? "http://127.0.0.1:8080";

export default defineConfig({
  plugins: [react()],
  build: { outDir: "dist", emptyOutDir: true, sourcemap: false },
  server: {
    proxy: Object.fromEntries(["/v1", "/openapi.json", "/healthz", "/readyz"].map((p) => [p, api])),
  },
});

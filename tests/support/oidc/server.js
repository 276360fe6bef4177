// A real OpenID Connect provider for the SSO tests: panva's oidc-provider (certified by the
// OpenID Foundation) with one confidential client, PKCE required, and a plain login page whose
// accounts come from the JSON config file named on the command line:
//   node server.js CONFIG.json
//   {"issuer": "http://localhost:PORT", "port": PORT,
//    "client": {"client_id": ..., "client_secret": ..., "redirect_uris": [...]},
//    "users": {"alice": {"password": ..., "email": ..., "email_verified": true, "groups": [...]}}}
// It prints "ready" on stdout once it listens. Consent is given with the login: Zeus is a
// first-party client of the provider here, as it is at a company's own identity provider.

import { generateKeyPairSync } from "node:crypto";
import { readFileSync } from "node:fs";
import http from "node:http";

import Provider from "oidc-provider";

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const users = config.users;

const { privateKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: "jwk" }), kid: "test-key", use: "sig", alg: "RS256" };

const provider = new Provider(config.issuer, {
  clients: [
    {
      ...config.client,
      grant_types: ["authorization_code"],
      response_types: ["code"],
      token_endpoint_auth_method: "client_secret_basic",
    },
  ],
  jwks: { keys: [signingKey] },
  // PKCE for every client, not only public ones: a request without it must fail in the tests.
  pkce: { required: () => true },
  scopes: ["openid", "email", "profile", "groups"],
  claims: {
    openid: ["sub"],
    email: ["email", "email_verified"],
    profile: ["name"],
    groups: ["groups"],
  },
  features: { devInteractions: { enabled: false } },
  async findAccount(ctx, id) {
    const user = users[id];
    if (!user) return undefined;
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: user.email,
          email_verified: user.email_verified ?? true,
          name: user.name ?? id,
          groups: user.groups ?? [],
        };
      },
    };
  },
  cookies: { keys: ["zeus-test-oidc-cookie-key"] },
});

const escapeHtml = (text) =>
  String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

function loginPage(uid, message) {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Test provider sign-in</title></head>
<body><h1>Test identity provider</h1>${message ? `<p role="alert">${escapeHtml(message)}</p>` : ""}
<form method="post" action="/interaction/${escapeHtml(uid)}/login">
<label>Username <input name="login" autocomplete="username"></label>
<label>Password <input name="password" type="password" autocomplete="current-password"></label>
<button type="submit">Sign in</button></form></body></html>`;
}

async function readForm(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return new URLSearchParams(Buffer.concat(chunks).toString("utf8"));
}

async function grantAll(details, accountId) {
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId, clientId: details.params.client_id });
  grant.addOIDCScope(details.params.scope);
  return grant.save();
}

async function interactions(req, res) {
  const match = req.url.match(/^\/interaction\/([^/?]+)(\/login)?/);
  const details = await provider.interactionDetails(req, res);
  if (req.method === "GET" && details.prompt.name === "consent") {
    const grantId = await grantAll(details, details.session.accountId);
    await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    return;
  }
  if (req.method === "GET") {
    res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
    res.end(loginPage(match[1], ""));
    return;
  }
  const form = await readForm(req);
  const login = form.get("login") ?? "";
  const user = users[login];
  if (!user || user.password !== form.get("password")) {
    res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
    res.end(loginPage(match[1], "Wrong username or password."));
    return;
  }
  const grantId = await grantAll(details, login);
  await provider.interactionFinished(
    req,
    res,
    { login: { accountId: login }, consent: { grantId } },
    { mergeWithLastSubmission: false },
  );
}

const callback = provider.callback();
const server = http.createServer((req, res) => {
  if (req.url.startsWith("/interaction/")) {
    interactions(req, res).catch((error) => {
      res.writeHead(400, { "content-type": "text/plain" });
      res.end(`interaction failed: ${error.message}`);
    });
    return;
  }
  callback(req, res);
});
server.listen(config.port, "127.0.0.1", () => {
  process.stdout.write("ready\n");
});

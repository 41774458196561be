// A real OpenID Connect provider (panva's certified `oidc-provider`) for the broker's tests.
//
// Usage: node server.mjs ['{"port": 0, "prefix": "/realms/test", ...}']
// Options come as one JSON object, from argv[2] or else from the IDP_OPTIONS environment
// variable; IDP_PORT, if set, overrides `port`. When listening, the server prints exactly one JSON
// line to stdout: {"issuer": "...", "port": N, "discovery": "..."}. Everything else goes to stderr.
//
// Options:
//   host              listen address, default "127.0.0.1"
//   port              default 0 (a free port)
//   prefix            issuer path, e.g. "/realms/test" or "/auth/realms/test"; default "" (plain)
//   layout            "keycloak" (routes under /protocol/openid-connect/) or "default"; default
//                     "keycloak" when the prefix contains "/realms/", else "default"
//   clients           list of client metadata (client_id, client_secret, redirect_uris, and
//                     optionally token_endpoint_auth_method, grant_types, ...); grant_types
//                     default to authorization_code + refresh_token
//   accounts          object username -> claims, merged over the built-in accounts (alice, bob,
//                     carol); each account's claims must include "sub"; an "hd" claim (Google's
//                     hosted domain) is released with the email scope
//   pkceRequired      default true: every client must use PKCE (S256)
//   rotateRefreshToken default false: when true every refresh rotates the refresh token, and
//                     reusing a rotated one revokes the whole grant
//   idTokenClaims     "conform" (default: profile/email/groups claims only from userinfo, as
//                     OIDC Core 5.4 says for the code flow) or "all" (also in the id_token)
//   ttl               object of seconds: accessToken, idToken, refreshToken (defaults 3600,
//                     3600, 86400)
//   signIn            "hint" (default: no form, see below) or "form": a sign-in page whose
//                     form posts a username and a password, checked against a scrypt hash
//                     made at start with the parameters the scrypt paper gives for interactive
//                     logins (N=2^14, r=8, p=1), as a real IdP's sign-in costs CPU; every
//                     account's password is "<username>-password"
//
// Interaction ("hint"): there are no HTML forms. The interaction route logs in the account named by the
// authorization request's `login_hint` (default "alice") and grants whatever consent is asked, so
// a cookie-keeping HTTP client that just follows redirects ends up at the redirect_uri. Special
// hints: "deny" answers error=access_denied, "error:CODE" answers error=CODE; an unknown user
// answers access_denied. With "form", the login prompt is that page instead (a wrong password
// shows it again with 401); consent is granted as with "hint".

import { generateKeyPairSync, randomBytes, scrypt, scryptSync, timingSafeEqual } from 'node:crypto';
import { createServer } from 'node:http';
import process from 'node:process';

import Provider from 'oidc-provider';

const log = (...args) => console.error('[idp]', ...args);

function readOptions() {
  const raw = process.argv[2] ?? process.env.IDP_OPTIONS ?? '{}';
  let options;
  try {
    options = JSON.parse(raw);
  } catch (err) {
    throw new Error(`options must be a JSON object: ${err.message}`);
  }
  if (options === null || typeof options !== 'object' || Array.isArray(options)) {
    throw new Error('options must be a JSON object');
  }
  if (process.env.IDP_PORT !== undefined && process.env.IDP_PORT !== '') {
    options.port = Number(process.env.IDP_PORT);
  }
  return options;
}

const DEFAULT_ACCOUNTS = {
  alice: {
    sub: '7f3c9a52-alice',
    preferred_username: 'alice',
    name: 'Alice Anderson',
    given_name: 'Alice',
    family_name: 'Anderson',
    email: 'alice@example.com',
    email_verified: true,
    groups: ['staff', 'platform'],
    realm_access: { roles: ['mcp-user'] },
    resource_access: { broker: { roles: ['admin', 'viewer'] } },
  },
  bob: {
    sub: '0b9d4e17-bob',
    preferred_username: 'bob',
    name: 'Bob Brown',
    given_name: 'Bob',
    family_name: 'Brown',
    email: 'bob@example.com',
    email_verified: false,
    groups: ['staff'],
    realm_access: { roles: ['mcp-user'] },
  },
  carol: {
    sub: 'c4r01000-carol',
    preferred_username: 'carol',
    name: 'Carol Chen',
    given_name: 'Carol',
    family_name: 'Chen',
    email: 'carol@contractor.example.net',
    email_verified: true,
    groups: ['contractors'],
    realm_access: { roles: [] },
  },
};

const KEYCLOAK_ROUTES = {
  authorization: '/protocol/openid-connect/auth',
  token: '/protocol/openid-connect/token',
  userinfo: '/protocol/openid-connect/userinfo',
  jwks: '/protocol/openid-connect/certs',
  end_session: '/protocol/openid-connect/logout',
  revocation: '/protocol/openid-connect/revoke',
  introspection: '/protocol/openid-connect/token/introspect',
};

function normalisePrefix(prefix) {
  if (prefix === undefined || prefix === null || prefix === '' || prefix === '/') return '';
  if (typeof prefix !== 'string' || !prefix.startsWith('/') || prefix.includes('?')) {
    throw new Error('prefix must be a path starting with "/"');
  }
  return prefix.replace(/\/+$/, '');
}

// The scrypt paper's parameters for interactive logins (Node's defaults too).
const SCRYPT = { N: 16384, r: 8, p: 1 };

function passwordHashes(accounts) {
  const hashes = new Map();
  for (const username of Object.keys(accounts)) {
    const salt = randomBytes(16);
    hashes.set(username, { salt, hash: scryptSync(`${username}-password`, salt, 32, SCRYPT) });
  }
  return hashes;
}

function checkPassword(hashes, username, password) {
  const stored = hashes.get(username);
  // An unknown user costs the same as a known one.
  const { salt, hash } = stored ?? { salt: randomBytes(16), hash: randomBytes(32) };
  return new Promise((resolve, reject) => {
    scrypt(String(password), salt, 32, SCRYPT, (err, derived) => {
      if (err) reject(err);
      else resolve(Boolean(stored) && timingSafeEqual(derived, hash));
    });
  });
}

function readForm(req) {
  return new Promise((resolve, reject) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => {
      body += chunk;
      if (body.length > 16384) reject(new Error('form too large'));
    });
    req.on('end', () => resolve(new URLSearchParams(body)));
    req.on('error', reject);
  });
}

const escapeHtml = (value) => String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function signInPage(res, action, status, message) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/html; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  res.end(`<!doctype html><html><head><meta charset="utf-8"><title>Sign in</title></head><body>
<h1>Sign in to the test IdP</h1>${message ? `<p role="alert">${escapeHtml(message)}</p>` : ''}
<form method="post" action="${escapeHtml(action)}">
<label>Username <input name="username" autocomplete="username" required></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button>
</form></body></html>`);
}

function clientMetadata(client) {
  if (!client || typeof client.client_id !== 'string') {
    throw new Error('every client needs a client_id');
  }
  return {
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    ...client,
  };
}

function grantEverything(provider, interaction) {
  // Grant exactly what the prompt says is missing (OIDC scopes, claims, resource scopes).
  const { prompt: { details }, params, session, grantId } = interaction;
  return (async () => {
    const grant = grantId
      ? await provider.Grant.find(grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (details.missingOIDCScope) grant.addOIDCScope(details.missingOIDCScope.join(' '));
    if (details.missingOIDCClaims) grant.addOIDCClaims(details.missingOIDCClaims);
    if (details.missingResourceScopes) {
      for (const [indicator, scopes] of Object.entries(details.missingResourceScopes)) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
    }
    return grant.save();
  })();
}

async function main() {
  const options = readOptions();
  const host = options.host ?? '127.0.0.1';
  const prefix = normalisePrefix(options.prefix);
  const layout = options.layout ?? (prefix.includes('/realms/') ? 'keycloak' : 'default');
  if (!['keycloak', 'default'].includes(layout)) throw new Error('layout must be "keycloak" or "default"');
  const accounts = { ...DEFAULT_ACCOUNTS, ...(options.accounts ?? {}) };
  for (const [username, claims] of Object.entries(accounts)) {
    if (!claims || typeof claims.sub !== 'string' || !claims.sub) {
      throw new Error(`account ${username} needs a "sub" claim`);
    }
  }
  const bySub = new Map(Object.values(accounts).map((claims) => [claims.sub, claims]));
  const ttl = { accessToken: 3600, idToken: 3600, refreshToken: 86400, ...(options.ttl ?? {}) };
  const pkceRequired = options.pkceRequired ?? true;
  const conform = (options.idTokenClaims ?? 'conform') === 'conform';
  const signIn = options.signIn ?? 'hint';
  if (!['hint', 'form'].includes(signIn)) throw new Error('signIn must be "hint" or "form"');
  const hashes = signIn === 'form' ? passwordHashes(accounts) : null;

  // Bind first: the issuer must carry the real port.
  const server = createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(Number(options.port ?? 0), host, resolve);
  });
  const { port } = server.address();
  const hostForUrl = host.includes(':') ? `[${host}]` : host;
  const origin = `http://${hostForUrl}:${port}`;
  const issuer = `${origin}${prefix}`;

  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: `test-${randomBytes(4).toString('hex')}`, use: 'sig', alg: 'RS256' };

  const configuration = {
    clients: (options.clients ?? []).map(clientMetadata),
    jwks: { keys: [signingKey] },
    cookies: { keys: [randomBytes(32).toString('hex')] },
    claims: {
      openid: ['sub'],
      // hd: Google's hosted domain. With the email scope, so that "conform" puts it in UserInfo
      // only and "all" in the ID Token as well, as Google does.
      email: ['email', 'email_verified', 'hd'],
      profile: ['name', 'given_name', 'family_name', 'preferred_username'],
      groups: ['groups', 'realm_access', 'resource_access'],
    },
    scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
    conformIdTokenClaims: conform,
    async findAccount(_ctx, sub) {
      const claims = bySub.get(sub);
      if (!claims) return undefined;
      return { accountId: sub, async claims() { return { ...claims }; } };
    },
    features: {
      devInteractions: { enabled: false },
      revocation: { enabled: true },
      introspection: { enabled: true },
      rpInitiatedLogout: { enabled: true },
      // Opaque access tokens for the userinfo endpoint, like most providers hand out.
      resourceIndicators: { enabled: false },
    },
    pkce: { required: () => pkceRequired },
    interactions: { url: (_ctx, interaction) => `${prefix}/interaction/${interaction.uid}` },
    rotateRefreshToken: Boolean(options.rotateRefreshToken),
    ttl: {
      AccessToken: ttl.accessToken,
      AuthorizationCode: 60,
      IdToken: ttl.idToken,
      RefreshToken: ttl.refreshToken,
      Interaction: 600,
      Session: 3600,
      Grant: ttl.refreshToken,
    },
    routes: layout === 'keycloak' ? KEYCLOAK_ROUTES : {},
    async renderError(ctx, out) {
      ctx.type = 'json';
      ctx.body = out;
    },
  };

  const provider = new Provider(issuer, configuration);
  provider.on('server_error', (_ctx, err) => log('server_error', err));
  const callback = provider.callback();
  const interactionPath = new RegExp(`^${prefix.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}/interaction/([^/?]+)/?(?:\\?.*)?$`);

  async function interact(req, res, submitted) {
    const interaction = await provider.interactionDetails(req, res);
    const { prompt, params } = interaction;
    if (prompt.name === 'login' && hashes) {
      const action = `${prefix}/interaction/${interaction.uid}/login`;
      if (!submitted) {
        signInPage(res, action, 200, '');
        return;
      }
      const form = await readForm(req);
      const username = form.get('username') ?? '';
      if (!(await checkPassword(hashes, username, form.get('password') ?? ''))) {
        signInPage(res, action, 401, 'Wrong username or password.');
        return;
      }
      const result = { login: { accountId: accounts[username].sub } };
      await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
      return;
    }
    if (prompt.name === 'login') {
      const hint = typeof params.login_hint === 'string' && params.login_hint ? params.login_hint : 'alice';
      let result;
      if (hint === 'deny') {
        result = { error: 'access_denied', error_description: 'the test user said no' };
      } else if (hint.startsWith('error:')) {
        result = { error: hint.slice('error:'.length), error_description: 'the test IdP was told to fail' };
      } else if (!accounts[hint]) {
        result = { error: 'access_denied', error_description: 'no such test user' };
      } else {
        result = { login: { accountId: accounts[hint].sub } };
      }
      await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
      return;
    }
    if (prompt.name === 'consent') {
      const grantId = await grantEverything(provider, interaction);
      await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
      return;
    }
    res.statusCode = 400;
    res.setHeader('Content-Type', 'application/json');
    res.end(JSON.stringify({ error: 'unsupported_prompt', prompt: prompt.name }));
  }

  const submitPath = new RegExp(`^${prefix.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}/interaction/([^/?]+)/login$`);

  server.on('request', (req, res) => {
    const url = req.url ?? '/';
    const submitted = req.method === 'POST' && submitPath.test(url);
    if (submitted || interactionPath.test(url)) {
      interact(req, res, submitted).catch((err) => {
        log('interaction failed', err);
        if (!res.headersSent) {
          res.statusCode = 400;
          res.setHeader('Content-Type', 'application/json');
          res.end(JSON.stringify({ error: 'interaction_failed', error_description: String(err.message) }));
        }
      });
      return;
    }
    if (prefix) {
      // Mount the provider under the prefix: oidc-provider works out its mount path from
      // originalUrl minus url, as it does under Express's app.use(prefix, ...).
      if (url !== prefix && !url.startsWith(`${prefix}/`) && !url.startsWith(`${prefix}?`)) {
        res.statusCode = 404;
        res.setHeader('Content-Type', 'application/json');
        res.end('{"error":"not_found"}');
        return;
      }
      const rest = url.slice(prefix.length);
      req.originalUrl = url;
      req.url = rest.startsWith('/') ? rest : `/${rest}`;
    }
    callback(req, res);
  });

  const shutdown = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);

  process.stdout.write(`${JSON.stringify({
    issuer, port, discovery: `${issuer}/.well-known/openid-configuration`,
  })}\n`);
  log(`listening: ${issuer} (layout ${layout})`);
}

main().catch((err) => {
  log('failed to start:', err);
  process.exit(1);
});

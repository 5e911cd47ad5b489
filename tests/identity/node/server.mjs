// A real, strict-rotation OpenID provider (npm oidc-provider) for the optional conformance test.
// Mounted under /<tenant> so that msal (authority=https://127.0.0.1:P/<tenant>,
// instance_discovery=False) finds it like Entra: its Entra-style discovery path is mapped to the
// provider's own. Test-only extras: POST /_seed (a grant and a refresh token for an account,
// as a sign-in would leave) and GET /_count (token requests served).
// Usage: node server.mjs PORT CERT KEY TENANT CLIENT_ID CLIENT_SECRET
import https from 'node:https';
import fs from 'node:fs';
import Provider from 'oidc-provider';

const [port, certFile, keyFile, tenant, clientId, clientSecret] = process.argv.slice(2);
const prefix = `/${tenant}`;
const scope = 'openid offline_access profile flows.execute';
const provider = new Provider(`https://127.0.0.1:${port}${prefix}`, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    token_endpoint_auth_method: 'client_secret_post',
    grant_types: ['authorization_code', 'refresh_token'],
    redirect_uris: ['https://127.0.0.1/cb'],
  }],
  scopes: ['openid', 'offline_access', 'profile', 'flows.execute'],
  claims: { openid: ['sub'], profile: ['preferred_username'] },
  conformIdTokenClaims: false,
  findAccount: async (ctx, sub) => ({
    accountId: sub,
    claims: async () => ({ sub, preferred_username: sub }),
  }),
  rotateRefreshToken: true,
  features: { devInteractions: { enabled: false } },
});
provider.proxy = false;
let tokenRequests = 0;
const callback = provider.callback();

async function seed(accountId) {
  const grant = new provider.Grant({ accountId, clientId });
  grant.addOIDCScope(scope);
  const grantId = await grant.save();
  const client = await provider.Client.find(clientId);
  return new provider.RefreshToken({
    accountId, client, grantId, scope, gty: 'authorization_code',
    authTime: Math.floor(Date.now() / 1000),
  }).save();
}

https.createServer({ cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile) }, async (req, res) => {
  if (req.url === '/_count') {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ token: tokenRequests }));
    return;
  }
  if (req.url.startsWith('/_seed')) {
    const accountId = new URL(req.url, 'https://x').searchParams.get('account');
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ refresh_token: await seed(accountId) }));
    return;
  }
  if (!req.url.startsWith(prefix)) { res.statusCode = 404; res.end(); return; }
  let path = req.url.slice(prefix.length) || '/';
  if (path.startsWith('/v2.0/.well-known/')) path = path.slice('/v2.0'.length);
  if (path.startsWith('/token')) tokenRequests += 1;
  req.originalUrl = prefix + path; // endpoint URLs are derived from it
  req.url = path;
  callback(req, res);
}).listen(Number(port), '127.0.0.1', () => console.log('ready'));

// A real OpenID Connect provider (npm oidc-provider, OpenID Certified) for the test suite.
// Issues client-credentials JWT access tokens carrying each client's tenant/role claims.
// Config from the environment: OIDC_PORT, OIDC_AUDIENCE, OIDC_JWKS (private JWKS JSON, first key signs),
// OIDC_CLIENTS: [{"client_id", "client_secret", "claims": {...}}].
import Provider from 'oidc-provider';

const port = Number(process.env.OIDC_PORT);
const audience = process.env.OIDC_AUDIENCE;
const jwks = JSON.parse(process.env.OIDC_JWKS);
const clients = JSON.parse(process.env.OIDC_CLIENTS);

const configuration = {
  clients: clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_post',
    'urn:dicomflow:claims': c.claims || {},
  })),
  extraClientMetadata: { properties: ['urn:dicomflow:claims'] },
  jwks,
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => audience,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'dicomweb',
        audience,
        accessTokenFormat: 'jwt',
        accessTokenTTL: 300,
        jwt: { sign: { alg: jwks.keys[0].alg || 'RS256' } },
      }),
    },
  },
  extraTokenClaims: async (ctx, token) => {
    const client = ctx.oidc.client;
    return client ? client['urn:dicomflow:claims'] : undefined;
  },
};

const provider = new Provider(`http://127.0.0.1:${port}`, configuration);
provider.listen(port, '127.0.0.1', () => console.log(`oidc-provider ready on ${port}`));

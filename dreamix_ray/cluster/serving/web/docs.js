// Swagger UI from the fastapi-offline wheel (no CDN); a file, not an inline script, so the CSP can forbid those.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  validatorUrl: null, // the default asks validator.swagger.io about the spec
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});

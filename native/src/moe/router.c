/* router.c: the router's choice for one token, exactly as reference.route takes it (moe.h). */
#include "moe/moe.h"

#include <math.h>
#include <string.h>

void moe_route(const tide_hparams *hp, const float *logit, const float *bias, int32_t *ids,
               float *w) {
    const int32_t E = hp->n_expert, K = hp->n_expert_used, G = hp->n_expert_groups;
    const int32_t gs = E / G;
    float s[E], c[E];
    for (int32_t e = 0; e < E; e++) {
        s[e] = 1.0f / (1.0f + expf(-logit[e]));
        c[e] = s[e] + bias[e];
    }
    if (G > 1) {
        float gscore[G];
        uint8_t keep[G];
        for (int32_t g = 0; g < G; g++) {
            float a = -INFINITY, b = -INFINITY; /* the two largest of the group */
            for (int32_t j = 0; j < gs; j++) {
                float v = c[g * gs + j];
                if (v > a) {
                    b = a;
                    a = v;
                } else if (v > b) {
                    b = v;
                }
            }
            gscore[g] = gs >= 2 ? a + b : a;
            keep[g] = 0;
        }
        for (int32_t n = 0; n < hp->n_group_used; n++) {
            int32_t best = -1;
            for (int32_t g = 0; g < G; g++)
                if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
            keep[best] = 1;
        }
        for (int32_t g = 0; g < G; g++)
            if (!keep[g])
                for (int32_t j = 0; j < gs; j++) c[g * gs + j] = -INFINITY;
    }
    uint8_t taken[E];
    memset(taken, 0, (size_t)E);
    for (int32_t k = 0; k < K; k++) {
        int32_t best = -1;
        for (int32_t e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || c[e] > c[best])) best = e;
        taken[best] = 1;
        ids[k] = best;
        w[k] = s[best];
    }
    if (K > 1 && hp->expert_weights_norm) {
        float sum = 0.0f;
        for (int32_t k = 0; k < K; k++) sum += w[k];
        for (int32_t k = 0; k < K; k++) w[k] = w[k] / (sum + 1e-20f);
    }
    for (int32_t k = 0; k < K; k++) w[k] *= hp->expert_weights_scale;
}

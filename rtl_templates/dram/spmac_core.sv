// spmac_core: the PE array fed by streams: a layer's weight and scale words arrive from DRAM (through the
// fetch FIFO), its activations over AXI-Stream, its geometry from the sequencer (s_cfg).
//
// Activations: each token's K inputs arrive as BPR beats (tlast on the last) into one of two banks, so
// the next token loads while this one computes; a bank is replayed once per row pass. A beat fires when
// the bank is full, a weight word is there, the group's scale word is there on the group's last beat,
// and the PEs can move: one beat per cycle when the streams keep up. Results: one P-wide beat per pass,
// tlast on a token's last pass. Between layers the PEs drain before the next layer's shift applies,
// since the PEs round with the shift at their output.
// err_tlast (sticky): a token's beat count differed from the layer's beats per row.

`default_nettype none

module spmac_core #(
    parameter int P       = spmac_pkg::P,
    parameter int N       = spmac_pkg::N,
    parameter int M       = spmac_pkg::M,
    parameter int G       = spmac_pkg::G,
    parameter int WB      = spmac_pkg::WB,
    parameter int AB      = spmac_pkg::AB,
    parameter int PSW     = spmac_pkg::PSW,
    parameter int GACCW   = spmac_pkg::GACCW,
    parameter int SCW     = spmac_pkg::SCW,
    parameter int SPW     = spmac_pkg::SPW,
    parameter int TOTW    = spmac_pkg::TOTW,
    parameter int SHW     = spmac_pkg::SHW,
    parameter int OUTW    = spmac_pkg::OUTW,
    parameter int BPG     = 4,        // beats per quantization group
    parameter int BPR_MAX = 128,      // beats per row of the widest layer: k_max / (G*M)
    parameter int TOK_W   = 16,
    parameter int PASS_W  = 16,
    parameter int BPR_W   = 16
) (
    input  wire logic                   clk,
    input  wire logic                   rst_n,
    input  wire logic                   s_cfg_valid,
    output      logic                   s_cfg_ready,
    input  wire logic                   s_cfg_last,
    input  wire logic [TOK_W-1:0]       s_cfg_tokens,
    input  wire logic [PASS_W-1:0]      s_cfg_passes,
    input  wire logic [BPR_W-1:0]       s_cfg_bpr,
    input  wire logic [SHW-1:0]         s_cfg_shift,
    // weight words: PE p's slots at [p*SLOTW +: SLOTW] (values, then positions)
    input  wire logic                   s_w_valid,
    output      logic                   s_w_ready,
    input  wire logic [P*G*N*(WB+((M > 1) ? $clog2(M) : 1))-1:0] s_w_data,
    // scale words: PE p's mantissa at [p*SCW +: SCW]
    input  wire logic                   s_s_valid,
    output      logic                   s_s_ready,
    input  wire logic [P*SCW-1:0]       s_s_data,
    // activations
    input  wire logic                   s_axis_tvalid,
    output      logic                   s_axis_tready,
    input  wire logic [G*M*AB-1:0]      s_axis_tdata,
    input  wire logic                   s_axis_tlast,
    // results
    output      logic                   m_axis_tvalid,
    input  wire logic                   m_axis_tready,
    output      logic [P*OUTW-1:0]      m_axis_tdata,
    output      logic                   m_axis_tlast,
    output      logic                   done,          // pulse: the run's last layer's last result left the PEs
    output      logic                   err_tlast
);
    localparam int IDXW  = (M > 1) ? $clog2(M) : 1;
    localparam int SLOTW = G * N * (WB + IDXW);
    localparam int ABW   = $clog2(BPR_MAX + 1);
    localparam int AAW   = (BPR_MAX > 1) ? $clog2(BPR_MAX) : 1;
    localparam int GBW   = $clog2(BPG + 1);

    initial begin
        if (P < 1 || BPG < 1 || BPR_MAX < BPG || BPR_MAX % BPG != 0)
            $fatal(1, "spmac_core: need P >= 1 and BPR_MAX a positive multiple of BPG");
        if (ABW > BPR_W) $fatal(1, "spmac_core: BPR_W=%0d cannot count BPR_MAX=%0d", BPR_W, BPR_MAX);
    end

    // ---- the layer's geometry ------------------------------------------------------------------------
    logic              loaded, draining, last_layer;
    logic [TOK_W-1:0]  tokens, token;
    logic [PASS_W-1:0] passes, pass;
    logic [BPR_W-1:0]  bpr, beat;
    logic [GBW-1:0]    gbeat;
    logic [SHW-1:0]    shift;
    assign s_cfg_ready = !loaded;

    // ---- activation banks ----------------------------------------------------------------------------
    logic [G*M*AB-1:0] abank [2][BPR_MAX];
    logic [1:0]        afull;
    logic [ABW-1:0]    alen [2];            // beats each bank received
    logic              wsel, rsel;          // the bank being written, the bank being read
    logic [ABW-1:0]    wbeat;
    assign s_axis_tready = !afull[wsel];
    wire logic a_fire = s_axis_tvalid && s_axis_tready;

    always_ff @(posedge clk)
        if (a_fire && wbeat < ABW'(BPR_MAX)) abank[wsel][AAW'(wbeat)] <= s_axis_tdata;

    // ---- beat issue ----------------------------------------------------------------------------------
    logic [P-1:0] pe_s_ready, pe_m_valid;
    logic [P*OUTW-1:0] pe_data;
    logic skid_ready;
    wire logic pe_valid = &pe_m_valid;
    wire logic pe_ready = &pe_s_ready;
    wire logic last_beat  = beat == bpr - 1'b1;
    wire logic glast_beat = gbeat == GBW'(BPG - 1);
    wire logic last_pass  = pass == passes - 1'b1;
    wire logic last_token = token == tokens - 1'b1;
    wire logic go = loaded && !draining && afull[rsel] && s_w_valid && (!glast_beat || s_s_valid);
    wire logic fire = go && pe_ready;
    assign s_w_ready = fire;
    assign s_s_ready = fire && glast_beat;

    // results still to leave the PEs in this layer
    logic [TOK_W+PASS_W-1:0] results_left;
    wire logic r_fire = pe_valid && skid_ready;

    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            loaded <= 1'b0; draining <= 1'b0; last_layer <= 1'b0; tokens <= '0; token <= '0; passes <= '0;
            pass <= '0; bpr <= '0; beat <= '0; gbeat <= '0; shift <= '0; results_left <= '0; done <= 1'b0;
            afull <= '0; alen[0] <= '0; alen[1] <= '0; wsel <= 1'b0; rsel <= 1'b0; wbeat <= '0; err_tlast <= 1'b0;
        end else begin
            done <= 1'b0;
            if (!loaded) begin
                if (s_cfg_valid) begin
                    loaded <= 1'b1; last_layer <= s_cfg_last; tokens <= s_cfg_tokens; passes <= s_cfg_passes;
                    bpr <= s_cfg_bpr; shift <= s_cfg_shift; token <= '0; pass <= '0; beat <= '0; gbeat <= '0;
                    results_left <= (TOK_W+PASS_W)'(s_cfg_tokens) * (TOK_W+PASS_W)'(s_cfg_passes);
                end
            end else begin
                if (fire) begin
                    beat  <= last_beat ? '0 : beat + 1'b1;
                    gbeat <= glast_beat ? '0 : gbeat + 1'b1;
                    if (last_beat) begin
                        pass <= last_pass ? '0 : pass + 1'b1;
                        if (last_pass) begin
                            token <= token + 1'b1;
                            if (last_token) draining <= 1'b1;
                        end
                    end
                end
                if (r_fire) results_left <= results_left - 1'b1;
                if (draining && results_left == '0) begin
                    loaded <= 1'b0; draining <= 1'b0; done <= last_layer;
                end
            end
            // activation banks: written in turn, each freed after its token's last pass
            if (a_fire) begin
                wbeat <= s_axis_tlast ? '0 : (wbeat < ABW'(BPR_MAX) ? wbeat + 1'b1 : wbeat);
                if (s_axis_tlast) begin
                    afull[wsel] <= 1'b1; alen[wsel] <= wbeat + 1'b1; wsel <= !wsel;
                end
            end
            if (fire && last_beat && last_pass) begin
                afull[rsel] <= 1'b0; rsel <= !rsel;
                if (alen[rsel] != ABW'(bpr)) err_tlast <= 1'b1;
            end
        end

    // ---- the PEs -------------------------------------------------------------------------------------
    wire logic [G*M*AB-1:0] act = abank[rsel][AAW'(beat)];
    for (genvar p = 0; p < P; p++) begin : g_pe
        wire logic [SLOTW-1:0] slots = s_w_data[p*SLOTW +: SLOTW];
        spmac_pe #(.N(N), .M(M), .G(G), .WB(WB), .AB(AB), .IDXW(IDXW), .PSW(PSW), .GACCW(GACCW), .SCW(SCW),
                   .SPW(SPW), .TOTW(TOTW), .SHW(SHW), .OUTW(OUTW)) u_pe (
            .clk, .rst_n,
            .cfg_shift(shift),
            .s_valid(go),
            .s_ready(pe_s_ready[p]),
            .s_act(act),
            .s_w(slots[0 +: G*N*WB]),
            .s_idx(slots[G*N*WB +: G*N*IDXW]),
            .s_scale(s_s_data[p*SCW +: SCW]),
            .s_glast(glast_beat),
            .s_last(last_beat),
            .m_valid(pe_m_valid[p]),
            .m_ready(skid_ready),
            .m_data(pe_data[p*OUTW +: OUTW])
        );
    end

    // ---- results: one P-wide beat per pass, tlast on a token's last pass ------------------------------
    logic [PASS_W-1:0] out_pass;
    wire logic out_last = out_pass == passes - 1'b1;
    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) out_pass <= '0;
        else if (r_fire) out_pass <= out_last ? '0 : out_pass + 1'b1;

    axis_skid #(.W(P*OUTW)) u_skid (
        .clk, .rst_n,
        .s_valid(pe_valid), .s_ready(skid_ready), .s_data(pe_data), .s_last(out_last),
        .m_valid(m_axis_tvalid), .m_ready(m_axis_tready), .m_data(m_axis_tdata), .m_last(m_axis_tlast)
    );
endmodule

`default_nettype wire
